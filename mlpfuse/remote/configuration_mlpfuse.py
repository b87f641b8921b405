"""Configuration class shipped inside every mlpfuse checkpoint (loaded with trust_remote_code).

It holds the base model's configuration fields unchanged, plus ``base_model_type`` (the model_type
of the original architecture) and the ``mlpfuse`` section that says which MLP modules were
narrowed. The distinct ``model_type`` makes a plain ``AutoModel.from_pretrained`` without
``trust_remote_code`` fail loudly instead of loading mismatched shapes.
"""

from transformers import PretrainedConfig


class MlpFuseConfig(PretrainedConfig):
    model_type = "mlpfuse"

    def __init__(self, base_model_type=None, mlpfuse=None, **kwargs):
        self.base_model_type = base_model_type
        self.mlpfuse = mlpfuse or {}
        super().__init__(**kwargs)
