"""fusion: pretrained encoders per modality, fusers, heads, and the model that routes between them."""
