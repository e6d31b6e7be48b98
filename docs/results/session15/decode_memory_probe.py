"""Peak RSS growth of one decode_image call (serving decoder, 224 px preset) for a PNG file made beforehand."""
import resource, sys
from pathlib import Path
from app.inference.images import decode_image, configure_pillow
from models.transforms import EvalPreset
data = Path(sys.argv[1]).read_bytes()
configure_pillow(max_pixels=40_000_000)
preset = EvalPreset(image_size=224, mean=(0.5,) * 3, std=(0.25,) * 3)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = decode_image(data, max_bytes=200 * 2**20, max_pixels=40_000_000, draft_size=preset.draft_request, min_contrast=2.0)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(f"{sys.argv[1]} ({len(data)/2**20:.2f} MiB upload): output {out.size}, peak RSS growth {(after-before)/1024:.1f} MiB")
