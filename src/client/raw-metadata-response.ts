/**
 * A wire-compatible view of GetMetadataAllocatedResponse / GetMetadataDeltaResponse for the client's hot
 * path. The generated message decodes every BlockMetadata tuple into an object with two bigints, which
 * capped the client near 0.1 M extents/s; this schema declares field 3 (`block_metadata`) as repeated bytes,
 * so each tuple arrives as a byte slice that decodeTuple() reads with two varints. Fields 1 and 2 are as in
 * csi.proto. Requests still use the generated messages.
 */
import { create, createFileRegistry, type DescMessage, type DescMethodServerStreaming } from '@bufbuild/protobuf';
import { FieldDescriptorProto_Label as Label, FieldDescriptorProto_Type as Type, FileDescriptorProtoSchema } from '@bufbuild/protobuf/wkt';
import { SnapshotMetadata } from '../gen/csi/v1/csi_pb.js';

const file = create(FileDescriptorProtoSchema, {
  name: 'cbt/client/raw_metadata_response.proto',
  package: 'cbt.client',
  syntax: 'proto3',
  messageType: [
    {
      name: 'RawMetadataResponse',
      field: [
        { name: 'block_metadata_type', jsonName: 'blockMetadataType', number: 1, type: Type.INT32, label: Label.OPTIONAL },
        { name: 'volume_capacity_bytes', jsonName: 'volumeCapacityBytes', number: 2, type: Type.INT64, label: Label.OPTIONAL },
        { name: 'block_metadata', jsonName: 'blockMetadata', number: 3, type: Type.BYTES, label: Label.REPEATED },
      ],
    },
  ],
});

/** The response with its tuples left as bytes. */
export const RawMetadataResponse: DescMessage = createFileRegistry(file, () => undefined).getMessage('cbt.client.RawMetadataResponse')!;

export interface RawMetadataResponseShape {
  blockMetadataType: number;
  volumeCapacityBytes: bigint;
  blockMetadata: Uint8Array[];
}

/** The SnapshotMetadata streaming methods, answering RawMetadataResponse. */
export function rawMethod(name: 'getMetadataAllocated' | 'getMetadataDelta'): DescMethodServerStreaming {
  const method = SnapshotMetadata.method[name];
  return { ...method, output: RawMetadataResponse } as unknown as DescMethodServerStreaming;
}

/** Reads one BlockMetadata body (field 1 byte_offset, field 2 size_bytes; others skipped) into out[at], out[at+1]. */
export function decodeTuple(bytes: Uint8Array, out: Float64Array, at: number): void {
  let pos = 0;
  let offset = 0;
  let size = 0;
  const varint = (): number => {
    let result = 0;
    let scale = 1;
    for (let i = 0; i < 10; i++) {
      const b = bytes[pos++];
      if (b === undefined) throw new Error('BlockMetadata: truncated varint');
      result += (b & 127) * scale;
      if (b < 128) return result;
      scale *= 128;
    }
    throw new Error('BlockMetadata: varint too long');
  };
  while (pos < bytes.length) {
    const tag = varint();
    const wire = tag & 7;
    if (tag === 8) offset = varint();
    else if (tag === 16) size = varint();
    else if (wire === 0) varint();
    else if (wire === 1) pos += 8;
    else if (wire === 5) pos += 4;
    else if (wire === 2) pos += varint();
    else throw new Error(`BlockMetadata: unsupported wire type ${wire}`);
  }
  out[at] = offset;
  out[at + 1] = size;
}
