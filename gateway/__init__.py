"""The HTTP gateway (Starlette): ``uvicorn --factory gateway.app:create_app``."""
