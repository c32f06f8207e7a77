#!/usr/bin/env python3
"""An independent Modbus RTU device for fieldgate-firmware-bridge's tests.

Serves one unit id with pymodbus (3.x) on a serial port, typically one end of a
`socat -d -d pty,raw,echo=0 pty,raw,echo=0` pair. The values come from a JSON spec and are
encoded here with Python's `struct` module, independently of the Rust encoder, so a test that
reads them back checks the Rust decoder against a second implementation:

    {
      "holding":  [{"address": 0, "type": "u16", "value": 54321},
                   {"address": 2, "type": "f32", "word_order": "little", "value": -1013.25}],
      "input":    [...],
      "coils":    [{"address": 0, "value": true}],
      "discrete": [...]
    }

Types: u16, i16, u32, i32, f32; word_order (32-bit types): big (high word first, the default)
or little. Addresses are the 0-based addresses on the wire.

Usage: pymodbus_rtu_server.py --port PATH --unit ID --spec SPEC.json [--baudrate N]
"""

import argparse
import json
import struct
import sys

import pymodbus
from pymodbus.datastore import ModbusSequentialDataBlock, ModbusServerContext
from pymodbus.server import StartSerialServer

try:  # pymodbus >= 3.9
    from pymodbus.datastore import ModbusDeviceContext as DeviceContext
except ImportError:  # pymodbus < 3.9
    from pymodbus.datastore import ModbusSlaveContext as DeviceContext

try:  # pymodbus >= 3.7
    from pymodbus import FramerType

    RTU_FRAMER = FramerType.RTU
except ImportError:  # pymodbus < 3.7
    from pymodbus.transaction import ModbusRtuFramer as RTU_FRAMER

PACK_FORMATS = {"u16": ">H", "i16": ">h", "u32": ">I", "i32": ">i", "f32": ">f"}


def register_words(entry):
    """The 16-bit words of one value, in address order."""
    kind = entry["type"]
    packed = struct.pack(PACK_FORMATS[kind], entry["value"])
    words = list(struct.unpack(">%dH" % (len(packed) // 2), packed))
    if len(words) == 2 and entry.get("word_order", "big") == "little":
        words.reverse()
    return words


def sequential_values(items, default):
    """A list indexed by wire address, from {address: value}."""
    size = (max(items) + 1) if items else 1
    return [items.get(address, default) for address in range(size)]


def data_block(values):
    """A block whose wire address N serves values[N].

    pymodbus numbers a device context's items from 1, as the Modbus data model does: up to 3.15
    it adds one to the wire address before looking it up, so a block starting at 0 serves wire
    address N from its element N + 1 (TOOLCHAIN.md); 3.16 maps a block starting at A to
    data-model address A - 1 and refuses A = 0. A block starting at 1 serves wire address N from
    element N in both.
    """
    return ModbusSequentialDataBlock(1, values)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", required=True)
    parser.add_argument("--unit", type=int, required=True)
    parser.add_argument("--spec", required=True)
    parser.add_argument("--baudrate", type=int, default=19200)
    args = parser.parse_args()

    with open(args.spec, encoding="utf-8") as spec_file:
        spec = json.load(spec_file)

    tables = {}
    for table in ("holding", "input"):
        words = {}
        for entry in spec.get(table, []):
            for offset, word in enumerate(register_words(entry)):
                words[entry["address"] + offset] = word
        tables[table] = data_block(sequential_values(words, 0))
    for table in ("coils", "discrete"):
        bits = {entry["address"]: bool(entry["value"]) for entry in spec.get(table, [])}
        tables[table] = data_block(sequential_values(bits, False))

    device = DeviceContext(
        di=tables["discrete"], co=tables["coils"], hr=tables["holding"], ir=tables["input"]
    )
    try:
        context = ModbusServerContext(devices={args.unit: device}, single=False)
    except TypeError:  # pymodbus < 3.9 calls them slaves
        context = ModbusServerContext(slaves={args.unit: device}, single=False)

    print(
        "pymodbus %s serving unit %d on %s" % (pymodbus.__version__, args.unit, args.port),
        file=sys.stderr,
        flush=True,
    )
    StartSerialServer(
        context=context,
        framer=RTU_FRAMER,
        port=args.port,
        baudrate=args.baudrate,
        bytesize=8,
        parity="N",
        stopbits=1,
    )


if __name__ == "__main__":
    main()
