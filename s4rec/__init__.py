"""S4Rec: online self-supervised self-distillation for sequential recommendation."""
