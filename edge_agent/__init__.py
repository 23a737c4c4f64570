"""edge_agent: the aiohttp generation service that runs on each node.

It loads an artifact (or a diffusers directory) with ``zimage_edge.model.loading`` and serves
``zimage_edge.request.GenerationRequest`` over local HTTP.
"""
