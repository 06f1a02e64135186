"""Model building blocks: modality encoders (image, EHR) chosen by name from configs."""
