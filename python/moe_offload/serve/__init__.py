"""`moe-offload serve`: an OpenAI-compatible HTTP server over one offloaded
model, on transformers' continuous batching.

engine.Engine: the model, its tokenizer and one continuous-batching manager;
app.build_app: the FastAPI routes; command: the CLI arguments and process.
Needs the `serve` extra (FastAPI, uvicorn)."""
