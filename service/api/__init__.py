"""The HTTP API: routes and handlers, wire models, validation and errors, auth, the OpenAPI
document and docs, and the web page. Handlers read through the task registry and change
tasks only through the task service."""
