"""medlora: LoRA/QLoRA fine-tuning of chat models into careful medical assistants.

The pipeline, one module each: config -> model -> adapters -> data -> train -> tracking.
"""
