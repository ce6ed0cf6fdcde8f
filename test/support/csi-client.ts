/**
 * A CSI client on @grpc/grpc-js — an independent gRPC stack from the server's (connect-node), the way
 * kubelet and the sidecars (grpc-go) talk to a driver. Messages are encoded with our generated schemas.
 */
import * as grpc from '@grpc/grpc-js';
import {
  create,
  fromBinary,
  toBinary,
  type DescMethod,
  type MessageInitShape,
  type MessageShape,
} from '@bufbuild/protobuf';
import type { GenService, GenServiceMethods } from '@bufbuild/protobuf/codegenv2';

type Methods<S> = S extends GenService<infer M> ? M : never;
type UnaryNames<M extends GenServiceMethods> = {
  [K in keyof M]: M[K]['methodKind'] extends 'unary' ? K : never;
}[keyof M];
type StreamNames<M extends GenServiceMethods> = {
  [K in keyof M]: M[K]['methodKind'] extends 'server_streaming' ? K : never;
}[keyof M];

/** A gRPC error as grpc-js reports it: `code` is the numeric status. */
export type RpcError = grpc.ServiceError;

/** A typed client for one service. */
export class ServiceClient<S extends GenService<GenServiceMethods>> {
  private readonly client: grpc.Client;

  constructor(
    private readonly service: S,
    /** grpc-js target, e.g. `unix:///tmp/x/csi.sock` */
    target: string,
    options: grpc.ChannelOptions = {},
    /** Plaintext unless given (the driver's socket is plaintext; its peer listener is mutual TLS). */
    credentials: grpc.ChannelCredentials = grpc.credentials.createInsecure(),
  ) {
    this.client = new grpc.Client(target, credentials, {
      'grpc.max_receive_message_length': 64 * 1024 * 1024,
      ...options,
    });
  }

  private path(method: DescMethod): string {
    return `/${this.service.typeName}/${method.name}`;
  }

  /** Calls a unary method. Rejects with the grpc-js ServiceError (numeric `code`, `details`). */
  call<K extends UnaryNames<Methods<S>> & string>(
    name: K,
    request: MessageInitShape<Methods<S>[K]['input']>,
    options: { deadlineMs?: number; metadata?: grpc.Metadata } = {},
  ): Promise<MessageShape<Methods<S>[K]['output']>> {
    const method = (this.service.method as Record<string, DescMethod>)[name]!;
    const input = create(method.input, request as MessageInitShape<typeof method.input>);
    return new Promise((resolve, reject) => {
      this.client.makeUnaryRequest(
        this.path(method),
        (msg: typeof input) => Buffer.from(toBinary(method.input, msg)),
        (bytes: Buffer) => fromBinary(method.output, bytes),
        input,
        options.metadata ?? new grpc.Metadata(),
        { deadline: Date.now() + (options.deadlineMs ?? 30_000) },
        (err, value) => (err ? reject(err) : resolve(value as MessageShape<Methods<S>[K]['output']>)),
      );
    });
  }

  /** Sends raw bytes to a unary method (for malformed-request tests); resolves with the raw reply. */
  callRaw(name: string, bytes: Uint8Array, deadlineMs = 30_000): Promise<Buffer> {
    const method = (this.service.method as Record<string, DescMethod>)[name]!;
    return new Promise((resolve, reject) => {
      this.client.makeUnaryRequest(
        this.path(method),
        (b: Uint8Array) => Buffer.from(b),
        (b: Buffer) => b,
        bytes,
        new grpc.Metadata(),
        { deadline: Date.now() + deadlineMs },
        (err, value) => (err ? reject(err) : resolve(value as Buffer)),
      );
    });
  }

  /** Opens a server stream; the returned call can be cancelled, and iterated for messages. */
  stream<K extends StreamNames<Methods<S>> & string>(
    name: K,
    request: MessageInitShape<Methods<S>[K]['input']>,
    options: { deadlineMs?: number } = {},
  ): grpc.ClientReadableStream<MessageShape<Methods<S>[K]['output']>> {
    const method = (this.service.method as Record<string, DescMethod>)[name]!;
    const input = create(method.input, request as MessageInitShape<typeof method.input>);
    return this.client.makeServerStreamRequest(
      this.path(method),
      (msg: typeof input) => Buffer.from(toBinary(method.input, msg)),
      (bytes: Buffer) => fromBinary(method.output, bytes) as MessageShape<Methods<S>[K]['output']>,
      input,
      new grpc.Metadata(),
      { deadline: Date.now() + (options.deadlineMs ?? 120_000) },
    );
  }

  /** Opens a server stream whose messages arrive as undecoded bytes (for clients with their own decoder). */
  streamRaw<K extends StreamNames<Methods<S>> & string>(
    name: K,
    request: MessageInitShape<Methods<S>[K]['input']>,
    options: { deadlineMs?: number } = {},
  ): grpc.ClientReadableStream<Buffer> {
    const method = (this.service.method as Record<string, DescMethod>)[name]!;
    const input = create(method.input, request as MessageInitShape<typeof method.input>);
    return this.client.makeServerStreamRequest(
      this.path(method),
      (msg: typeof input) => Buffer.from(toBinary(method.input, msg)),
      (bytes: Buffer) => bytes,
      input,
      new grpc.Metadata(),
      { deadline: Date.now() + (options.deadlineMs ?? 120_000) },
    );
  }

  /** Reads a whole server stream into an array (rejects with the stream's error). */
  async collect<K extends StreamNames<Methods<S>> & string>(
    name: K,
    request: MessageInitShape<Methods<S>[K]['input']>,
  ): Promise<MessageShape<Methods<S>[K]['output']>[]> {
    const out: MessageShape<Methods<S>[K]['output']>[] = [];
    for await (const message of this.stream(name, request)) out.push(message as MessageShape<Methods<S>[K]['output']>);
    return out;
  }

  close(): void {
    this.client.close();
  }
}

/**
 * The numeric gRPC code and the message of a rejected call (0 and '' if it succeeded). grpc-js leaves the
 * percent-encoding of grpc-message's reserved characters ("/" is %2F) in details: decoded here.
 */
export async function errorOf(promise: Promise<unknown>): Promise<{ code: number; details: string }> {
  try {
    await promise;
    return { code: 0, details: '' };
  } catch (err) {
    const e = err as RpcError;
    return { code: e.code, details: decodeURIComponent(e.details) };
  }
}

/** Asserts-friendly: the numeric gRPC code of a rejected call (or 0 if it succeeded). */
export async function codeOf(promise: Promise<unknown>): Promise<number> {
  try {
    await promise;
    return 0;
  } catch (err) {
    return (err as RpcError).code;
  }
}
