"""The OpenAI-compatible server: served models by name, each answered by a batching engine, picked per request.

Run: tunewright serve models:/support-ticket-json@champion
     tunewright serve billing=models:/tickets/3 shipping=runs/<run id>/finetune/adapter --port 8000

`engine` holds the served models (`Backend`: weights and the engine answering for them; `Engine`: every one by
name, the queue limit, the response cache), `shared_base` LoRA adapters served over one copy of their base and
batched together, `external` an engine in a process of its own (vLLM), `wiring` turns
the command line into those and runs the server, `watcher` follows registry aliases, `app` is the FastAPI
application (routes), `answer` the way of one completion request, `protocol` the request and error bodies,
`service` the metrics and the request-log record, `requestlog` where records are written.
"""
