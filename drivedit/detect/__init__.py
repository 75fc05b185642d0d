"""2-D object detection: detectors (torchvision heads on a ResNet-FPN or on DiT features), the detection
data, COCO evaluation per category / scenario / object size, and the Ray Train detection job."""
