"""Text/image retrieval over a folder of images with any moeclip or open_clip model."""
from moeclip.search.index import build_index, model_reference
from moeclip.search.query import Index, embed_query, load_index_model, open_index, search
from moeclip.search.sources import IMAGE_EXTENSIONS, list_images
from moeclip.search.topk import chunked_topk

__all__ = ["IMAGE_EXTENSIONS", "Index", "build_index", "chunked_topk", "embed_query", "list_images",
           "load_index_model", "model_reference", "open_index", "search"]
