# cython: language_level=3
"""The common case of OnnxModel.check_feeds (gateway/worker/model.py), compiled.

A request whose inputs are exactly the model's, each an ndarray of the declared
dtype, rank and fixed dimensions with a non-empty batch, passes here without a
Python frame. Anything else goes to the Python check, which casts what may be
cast and words the 400 for what may not.
"""
cimport numpy as cnp

cnp.import_array()


cdef class FeedCheck:
    cdef tuple names   # the model's input names, in order
    cdef tuple dtypes  # np.dtype of each
    cdef tuple shapes  # declared shape of each (-1: dynamic)
    cdef object slow   # check_feeds in Python: casts, or raises BadInput naming the problem

    def __init__(self, names, dtypes, shapes, slow):
        self.names = tuple(names)
        self.dtypes = tuple(dtypes)
        self.shapes = tuple(tuple(s) for s in shapes)
        self.slow = slow

    def __call__(self, dict feeds):
        cdef Py_ssize_t i, j, n = len(self.names)
        cdef cnp.ndarray array
        cdef tuple shape
        cdef cnp.npy_intp* dims
        if len(feeds) != n:
            return self.slow(feeds)
        for i in range(n):
            value = feeds.get(self.names[i])
            if type(value) is not cnp.ndarray:
                return self.slow(feeds)
            array = <cnp.ndarray>value
            if not cnp.PyArray_EquivTypes(<cnp.dtype>cnp.PyArray_DESCR(array),
                                          <cnp.dtype>self.dtypes[i]):
                return self.slow(feeds)
            shape = <tuple>self.shapes[i]
            if cnp.PyArray_NDIM(array) != len(shape):
                return self.slow(feeds)
            dims = cnp.PyArray_DIMS(array)
            for j in range(len(shape)):
                want = <long>shape[j]
                if (want >= 0 and dims[j] != want) or (j == 0 and dims[0] == 0):
                    return self.slow(feeds)
        return feeds
