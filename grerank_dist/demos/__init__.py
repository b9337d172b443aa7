"""The embedded demos (``demo``: synthetic multi-hop records, a tiny CEPE or FiD reader, G-Rerank,
evaluation; ``demo_smollm2``: real SmolLM2 and MiniLM), the records they generate (``synthetic``,
``reading``) and the tiny reader's training (``reader``). Applications of the library: nothing
else in the package imports them."""
