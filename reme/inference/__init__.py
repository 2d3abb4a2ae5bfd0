"""Inference by retrieval (Part 2 of the method, eqs. 1-3): class lists, retrieval against a
reference set, evidence, and the `Segmenter` facade (`reme.inference.segmenter`)."""
