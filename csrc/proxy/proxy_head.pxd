cpdef bytes request_head(bytes method, bytes target, list raw_headers, list extra)
cpdef bytes finish_request(bytes head, bytes host_line, bytes body)
cpdef tuple response_headers(list raw_headers)
