"""The OpenAI-compatible server: one base in memory, one or several adapters over it, picked per request.

Run: tunewright serve models:/support-ticket-json@champion
     tunewright serve billing=models:/tickets/3 shipping=runs/<run id>/finetune/adapter --port 8000

`engine` loads the base and the adapters (PEFT named adapters, switched per request), `app` is the
FastAPI application (`/v1/models`, `/v1/chat/completions`).
"""
