"""The per-batch work of the image stages: the classes that Ray Data actor pools run, one
batch of images in, one batch of rows out, on the actor's device.

They import neither Ray nor Parquet: a GPU machine with torch, timm, scipy, pycocotools and
faiss runs them as they are (`benchmarks/gpu_stages.py`), and the stages (`u2seg.stages`)
wrap them with reading, sharding and writing.
"""
