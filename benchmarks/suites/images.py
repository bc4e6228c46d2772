"""Image folders: the decoding pipeline alone, beside the ResNet step that consumes it (issue 26).

    python benchmarks/make_images.py runs/images-bench      (once: 10 classes, 500x375 JPEGs)
    jaxbig prepare images runs/images-bench --out runs/images-bench-packed   (once)
    jaxbig bench benchmarks/suites/images.py --out benchmarks/results/<device>/images
    jaxbig report benchmarks/results/<device>/images

Rows: ResNet-18 (3x3 stem) on 64x64 random-resized crops at batch 64, decoding in 2 worker
processes and in the training process, each with the training loop's host overhead and
input wait; the pipeline alone at 224x224 crops (ResNet-50's input) with 2 workers, from the
folder and from its ArrayRecord packing (`data.name=imagerecords`); and the loop of
`resnet50_imagenet.py:smoke` (a tiny ResNet on 32x32 crops, decoding in process), whose
short step shows the loop's own cost.
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
      {'name': 'resnet50-224px-records-2-workers',
       'experiment': 'experiments/resnet50_imagenet.py',
       'overrides': ['data.name=imagerecords', 'data.path=runs/images-bench-packed',
                     'data.workers=2', 'precision=fp32'], 'batch': 16, 'input': 20},
      {'name': 'resnet50-imagenet-smoke', 'experiment': 'experiments/resnet50_imagenet.py:smoke',
       'overrides': ['data.path=runs/images-bench'], 'batch': 8, 'loop': 40, 'input': 40},
  ]
