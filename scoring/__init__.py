"""Evaluating a trained model at real scale: prompt files (prompts), HPSv2 from its open_clip
checkpoint (hps), CLIP / PickScore / aesthetic / CLIP-FID / FVD scorers (scorers). evaluate.py
is their command line."""
