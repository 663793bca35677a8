"""The command-line client (`ics`): it talks to the service over HTTP only."""
