from .op import rpb_attention

__all__ = ["rpb_attention"]
