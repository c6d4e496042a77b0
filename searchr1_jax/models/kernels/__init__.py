"""Attention kernels; `searchr1_jax.models.attention` chooses among them.

  common.py   the visibility rule every implementation follows, the grouped-query row
              layout, the online-softmax step the Pallas kernels share;
  flash.py    Pallas flash attention for GPUs (Triton): forward and backward, key blocks
              up to each row block's last visible slot;
  ragged.py   Pallas attention over a KV cache for TPUs (Mosaic): decode steps and chunks
              fetch only the key blocks their rows use;
  library.py  splash attention (TPU) and jax.nn.dot_product_attention (cuDNN) for training rows.
"""
