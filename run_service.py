"""Start the image-classification service: `python run_service.py --help` lists the settings.

The same as the `ics-service` console script (see `service.main`)."""

from service.main import main

if __name__ == "__main__":
    main()
