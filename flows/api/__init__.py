"""The platform's HTTP front door (`esd api`): versioned under /v1, FastAPI + uvicorn."""
