"""The naive baseline: decode the upload and run the fp32 model at batch 1 inside the handler.

This is how most FER demos serve a model; `benchmarks/http.py` runs it beside the service.
    FER_CHECKPOINT=models/checkpoint.pth uvicorn benchmarks.naive_app:app --port 8001
"""

from __future__ import annotations

import io
import os
from typing import Annotated

import torch
from fastapi import FastAPI, File, UploadFile
from PIL import Image

from models.checkpoint import load_checkpoint
from models.preprocessing import preprocess

checkpoint = load_checkpoint(os.environ.get("FER_CHECKPOINT", "models/checkpoint.pth"))
network = checkpoint.network.eval()
app = FastAPI()


@app.post("/predict")
def predict(file: Annotated[UploadFile, File()]) -> dict[str, object]:
    image = Image.open(io.BytesIO(file.file.read()))
    with torch.inference_mode():
        face = torch.from_numpy(preprocess(image, checkpoint.preprocessing)).unsqueeze(0)
        probabilities = torch.softmax(network(face), dim=1)[0]
    scores = {name: float(p) for name, p in zip(checkpoint.classes, probabilities, strict=True)}
    return {"label": max(scores, key=scores.__getitem__), "probabilities": scores}
