"""The roles a simulated worker (``sim.worker``) plays: it prefills prompts and hands them off, decodes handed-off
sequences, or runs requests from prompt to last token (colocated). A worker's role changes only while it is empty
(``Worker.is_empty``)."""

PREFILL, DECODE, COLOCATED = "prefill", "decode", "colocated"
