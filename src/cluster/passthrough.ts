/**
 * A peer's reply, sent on as the bytes it arrived in. The message object carries no known field and the
 * whole encoding as one unknown-field entry (the first field's tag, then everything after it), which toBinary
 * writes verbatim: our caller receives exactly the owner's bytes, and nothing is decoded or re-encoded in
 * between (block-metadata-wire.ts uses the same property for the hot path).
 */
import { create, type DescMessage, type MessageShape } from '@bufbuild/protobuf';
import { WireType } from '@bufbuild/protobuf/wire';

/** A message of type `desc` that serializes to exactly `bytes`. */
export function passThrough<Desc extends DescMessage>(desc: Desc, bytes: Uint8Array): MessageShape<Desc> {
  const message = create(desc);
  if (bytes.length === 0) return message;
  let tag = 0;
  let pos = 0;
  for (let shift = 0; ; shift += 7) {
    if (pos >= bytes.length || shift > 28)
      throw new Error('a peer sent a message that does not start with a field tag');
    const b = bytes[pos++]!;
    tag += (b & 0x7f) * 2 ** shift;
    if (b < 0x80) break;
  }
  const no = Math.floor(tag / 8);
  const wireType = (tag & 7) as WireType;
  if (no === 0 || wireType > WireType.Bit32) throw new Error('a peer sent a message with an invalid first field tag');
  message.$unknown = [{ no, wireType, data: bytes.subarray(pos) }];
  return message;
}

/**
 * How often top-level field `fieldNo` occurs in an encoded message (e.g. BlockMetadata tuples in a metadata
 * response), skipping over field bodies without decoding them; 0 for bytes it cannot walk.
 */
export function countField(bytes: Uint8Array, fieldNo: number): number {
  let pos = 0;
  let count = 0;
  const varint = (): number => {
    let value = 0;
    for (let shift = 0; shift < 64; shift += 7) {
      if (pos >= bytes.length) return Number.NaN;
      const b = bytes[pos++]!;
      value += (b & 0x7f) * 2 ** shift;
      if (b < 0x80) return value;
    }
    return Number.NaN;
  };
  while (pos < bytes.length) {
    const tag = varint();
    if (Number.isNaN(tag)) return 0;
    if (Math.floor(tag / 8) === fieldNo) count++;
    switch (tag & 7) {
      case WireType.Varint:
        if (Number.isNaN(varint())) return 0;
        break;
      case WireType.Bit64:
        pos += 8;
        break;
      case WireType.Bit32:
        pos += 4;
        break;
      case WireType.LengthDelimited: {
        const length = varint();
        if (Number.isNaN(length)) return 0;
        pos += length;
        break;
      }
      default:
        return 0;
    }
  }
  return pos === bytes.length ? count : 0;
}
