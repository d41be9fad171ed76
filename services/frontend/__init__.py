"""The frontend service: OpenAI-compatible HTTP API and SDK endpoint in one process.

Requests are validated and tokenized here (``validation``, ``model_info``), submitted to the coordinator
(``coordinator_link``), and their tokens, pushed by the workers to this process's token-stream socket, are put in
order, detokenized and cut at stop strings (``tracker``, ``detokenizer``) before reaching the client (``http_api``,
``sdk_endpoint``). ``server`` wires it together; ``python -m diptych.services.frontend --help`` lists the flags.
"""
