"""The loader benchmark (vlmkit vs PIL + torchvision); code in vlmkit.bench.loader."""
from vlmkit.bench.loader import main

main()
