"""Inference by retrieval (Part 2 of the method, eqs. 1-3): the retrieval kernel
(`reme.inference.kernel`: one block loop over S_ref feeding softmax and top-k reducers), the eq.
functions built on it (`reme.inference.retrieval`), evidence (`reme.inference.evidence`), the
stateless `Predictor` (`reme.inference.predictor`), the `OverlayEditor` of examples
(`reme.inference.editor`), and the `Segmenter` facade joining the two (`reme.inference.segmenter`)."""
