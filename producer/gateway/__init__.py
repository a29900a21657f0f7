"""``embq serve``: an OpenAI-compatible HTTP gateway in front of the cache and the queue.

Needs the extra ``embq[serve]`` (Starlette, uvicorn). Nothing in ``producer``
imports this package, so producers stay light; ``embq.producer.gateway.settings``
alone imports no web framework.
"""
