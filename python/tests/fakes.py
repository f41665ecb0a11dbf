"""Stand-ins shared by the tests."""


class FakeTensor:
    """The parts of a torch tensor KvLayout.from_tensors reads, over caller-chosen memory."""

    def __init__(self, ptr, shape, stride=None, element_size=2, device_index=None):
        self.shape = tuple(shape)
        if stride is None:
            stride, acc = [], 1
            for size in reversed(shape):
                stride.insert(0, acc)
                acc *= size
        self._stride = tuple(stride)
        self._ptr = ptr
        self._esize = element_size
        self.device = type("Device", (), {"index": device_index})()

    def stride(self):
        return self._stride

    def element_size(self):
        return self._esize

    def data_ptr(self):
        return self._ptr
