"""The offline demo's own pieces: Fashion-MNIST read from Debian's files (`fashion_mnist`), the small
ViT teacher trained on its labels (`teacher`; also `python -m singer_hf.demo.teacher`), and a quick
L-BFGS linear probe (`probe`). scripts/demo.py runs them; the evidence study (benchmarks/evidence.py)
builds its teachers and probes with them too.
"""
