"""cxrscreen: DICOM-aware batch screening of chest radiographs.

The library API is what the CLI calls; see :mod:`cxrscreen.pipeline` for the
stages and :mod:`cxrscreen.normalise` for the one preprocessing path that
training and screening share.
"""

__version__ = "0.3.6"
LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"     # the CLI's log lines, and its report processes'
