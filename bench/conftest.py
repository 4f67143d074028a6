import sys
from pathlib import Path

# bench/ helpers (seed_way) import as plain modules
sys.path.insert(0, str(Path(__file__).resolve().parent))
