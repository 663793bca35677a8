"""Start the image-classification service: `python run_service.py --help` lists the settings.

The same as the `ics-service` console script (see `service.main`; why this file imports so
little: `service.entry`)."""

from service.entry import service

if __name__ == "__main__":
    service()
