"""Training LoRA experts on cached lower-layer states."""
