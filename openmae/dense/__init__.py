"""Transfer to dense prediction: semantic segmentation and object detection on the pretrained encoders.

data.py (fashion-scenes, COCO, ADE20K layout, paired transforms), metrics.py (mIoU, mAP), draw.py
(predictions drawn over images), pyramid.py, heads.py, models.py, tasks.py, runs.py.
"""
