"""Image folders: the decoding pipeline alone, beside the ResNet step that consumes it (issue 26).

    python benchmarks/make_images.py runs/images-bench      (once: 10 classes, 500x375 JPEGs)
    jaxbig bench benchmarks/suites/images.py --out benchmarks/results/<device>/images
    jaxbig report benchmarks/results/<device>/images

Rows: ResNet-18 (3x3 stem) on 64x64 random-resized crops at batch 64, decoding in 2 worker
processes and in the training process, each with the training loop's host overhead; and the
pipeline alone at 224x224 crops (ResNet-50's input) with 2 workers.
"""

SETTINGS = {'rounds': 1}


def rows() -> list[dict]:
  base = ['data.path=runs/images-bench', 'data.image_size=64', 'model.name=resnet18',
          'model.small_input=true', 'precision=fp32']
  return [
      {'name': 'resnet18-64px-2-workers', 'experiment': 'experiments/resnet50_imagenet.py',
       'overrides': base + ['data.workers=2'], 'batch': 64, 'loop': 20, 'input': 20},
      {'name': 'resnet18-64px-in-process', 'experiment': 'experiments/resnet50_imagenet.py',
       'overrides': base + ['data.workers=0'], 'batch': 64, 'loop': 20, 'input': 20},
      {'name': 'resnet50-224px-2-workers', 'experiment': 'experiments/resnet50_imagenet.py',
       'overrides': ['data.path=runs/images-bench', 'data.workers=2', 'precision=fp32'],
       'batch': 16, 'input': 20},
  ]
