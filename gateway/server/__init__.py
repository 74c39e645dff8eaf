"""HTTP/1.1 server core shared by the gateway and the workers (uvloop + httptools)."""
from .http import HttpServer, Request, Response, error_response, json_response

__all__ = ["HttpServer", "Request", "Response", "error_response", "json_response"]
