"""The server's routes, one module per endpoint family: ``generation`` (chat and text
completions), ``embeddings``, ``info`` (models, health, metrics) and ``playground``
(the web page, its static files, image search and the image files)."""
from . import embeddings, generation, info, playground

ROUTERS = (generation.router, embeddings.router, info.router, playground.router)
