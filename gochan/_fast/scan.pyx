# Byte scanners shared by the fast paths' parsers (publish.pyx, connect.pyx):
# each reads a strict subset of HTTP/1.1 and declines whatever else it meets.


cdef const char* _VERSION = b" HTTP/1.1\r\n"


cdef inline bint _topic_char(unsigned char c) noexcept:
    return 0x21 <= c <= 0x7e and c != b'&' and c != b'%' and c != b'+' and c != b'#'


cdef inline bint _lower_is(const unsigned char* s, const char* word, Py_ssize_t n) noexcept:
    # s holds letters, digits, "-" or (for values) printable ASCII: c | 0x20
    # lowers a letter, keeps a digit and "-", and maps no other printable byte
    # onto a letter, a digit or "-".
    cdef Py_ssize_t i
    for i in range(n):
        if (s[i] | 0x20) != <unsigned char>word[i]:
            return False
    return True


cdef inline const unsigned char* _value_start(const unsigned char* q,
                                              const unsigned char* end) noexcept:
    # Past the whitespace after a header's ":", which llhttp drops.
    while q < end and (q[0] == b' ' or q[0] == b'\t'):
        q += 1
    return q


cdef inline const unsigned char* _printable_end(const unsigned char* q,
                                                const unsigned char* end) noexcept:
    # Past the printable ASCII (spaces included) from q.
    while q < end and 0x20 <= q[0] <= 0x7e:
        q += 1
    return q
