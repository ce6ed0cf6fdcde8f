/**
 * Calls to other nodes' drivers, over one grpc-js channel per node (mutual TLS, peer-tls.ts). The request
 * is encoded once; the reply is not decoded: it goes back to our caller as the owner's bytes
 * (passthrough.ts). A stream holds one message at a time: the next is read from the owner only when our
 * caller's side has taken the previous one, so a slow reader slows the owner (HTTP/2 flow control) instead
 * of filling memory here.
 *
 * Statuses: the owner stamps every reply with its node ID (NODE_HEADER, as a header and a trailer). A status
 * carrying the owner's stamp is the owner's answer and passes unchanged (code and message). One without it
 * came from the transport (refused, reset, TLS failure): UNAVAILABLE naming the node, which is retryable. A
 * stamp of another node means the address is stale: UNAVAILABLE too.
 */
import { type DescMethod, type DescMessage, type MessageShape, toBinary } from '@bufbuild/protobuf';
import { Code, ConnectError, type HandlerContext } from '@connectrpc/connect';
import * as grpc from '@grpc/grpc-js';
import type { DriverMetrics } from '../metrics.js';
import { passThrough } from './passthrough.js';
import type { PeerDirectory } from './peer-directory.js';
import { EXACT_MESSAGE_TRAILER, NODE_HEADER } from './peer-protocol.js';
import { PEER_TLS_NAME, type PeerTls } from './peer-tls.js';

/** The longest reply accepted from a peer: far above any CSI reply (metadata messages are a few hundred KiB). */
const MAX_REPLY_BYTES = 64 * 1024 * 1024;

/** Channel settings for peers: reconnect soon after a node comes back, and keep idle connections checked. */
const CHANNEL_OPTIONS: grpc.ChannelOptions = {
  'grpc.ssl_target_name_override': PEER_TLS_NAME,
  'grpc.default_authority': PEER_TLS_NAME,
  'grpc.max_receive_message_length': MAX_REPLY_BYTES,
  'grpc.initial_reconnect_backoff_ms': 250,
  'grpc.max_reconnect_backoff_ms': 2000,
  'grpc.keepalive_time_ms': 30_000,
  'grpc.keepalive_timeout_ms': 10_000,
  // A 1 MiB receive window lets the owner stream ahead of our reads by a few messages, no more.
  'grpc-node.flow_control_window': 1024 * 1024,
  // Each channel owns its connection, so closing the channel of a stale address closes that connection.
  'grpc.use_local_subchannel_pool': 1,
};

type GrpcCall = ReturnType<grpc.Channel['createCall']>;

export interface PeerClientsOptions {
  directory: PeerDirectory;
  credentials: grpc.ChannelCredentials;
  metrics: DriverMetrics;
}

/** A reply stream message as received, with the decoded-for-free bits the caller may want. */
export interface PeerMessage<Desc extends DescMessage> {
  message: MessageShape<Desc>;
  bytes: Uint8Array;
}

export class PeerClients {
  private readonly channels = new Map<string, { address: string; channel: grpc.Channel }>();
  private closed = false;

  constructor(private readonly options: PeerClientsOptions) {}

  /** Calls a unary method on `node`; resolves with its reply as received. */
  async unary<I extends DescMessage, O extends DescMessage>(
    node: string,
    method: DescMethod & { input: I; output: O },
    request: MessageShape<I>,
    ctx: HandlerContext,
  ): Promise<MessageShape<O>> {
    const call = await this.open(node, method, request, ctx);
    try {
      const bytes = await call.next();
      if (bytes === undefined) throw call.failure(Code.Unavailable, 'ended the call without a reply');
      // The status must still be read: it says whether the reply is the owner's.
      if ((await call.next()) !== undefined) throw call.failure(Code.Unavailable, 'sent two replies to a unary call');
      return passThrough(method.output, bytes);
    } finally {
      call.end();
    }
  }

  /** Calls a server-streaming method on `node`, yielding its messages one at a time as received. */
  async *serverStream<I extends DescMessage, O extends DescMessage>(
    node: string,
    method: DescMethod & { input: I; output: O },
    request: MessageShape<I>,
    ctx: HandlerContext,
  ): AsyncGenerator<PeerMessage<O>> {
    const call = await this.open(node, method, request, ctx);
    try {
      for (;;) {
        const bytes = await call.next();
        if (bytes === undefined) return;
        yield { message: passThrough(method.output, bytes), bytes };
      }
    } finally {
      call.end();
    }
  }

  close(): void {
    this.closed = true;
    for (const { channel } of this.channels.values()) channel.close();
    this.channels.clear();
  }

  private async open(node: string, method: DescMethod, request: object, ctx: HandlerContext): Promise<PeerCall> {
    if (this.closed) throw new ConnectError('the driver is shutting down', Code.Unavailable);
    const address = await this.options.directory.lookup(node);
    if (address === undefined) {
      throw new ConnectError(
        `node ${node}, which holds this object, is unavailable: no driver for it is known (is its plugin pod running?)`,
        Code.Unavailable,
      );
    }
    const channel = this.channelTo(node, address);
    const timeoutMs = ctx.timeoutMs();
    const deadline = timeoutMs === undefined ? Number.POSITIVE_INFINITY : Date.now() + timeoutMs;
    const path = `/${method.parent.typeName}/${method.name}`;
    const call = new PeerCall(channel.createCall(path, deadline, null, null, 0), node, address, {
      onTransportFailure: () => this.options.directory.invalidate(node),
      onMessage: () => this.options.metrics.peerMessages.inc({ peer: node }),
      onStatus: (code) => this.options.metrics.peerRpcs.inc({ peer: node, method: method.name, code: codeName(code) }),
    });
    call.start(Buffer.from(toBinary(method.input, request as MessageShape<typeof method.input>)), ctx.signal);
    return call;
  }

  /** The channel to `address`; a node that moved (a new pod IP) gets a new channel and the old one closes. */
  private channelTo(node: string, address: string): grpc.Channel {
    const known = this.channels.get(node);
    if (known?.address === address) return known.channel;
    known?.channel.close();
    const channel = new grpc.Channel(address, this.options.credentials, CHANNEL_OPTIONS);
    this.channels.set(node, { address, channel });
    return channel;
  }
}

/** One call to a peer: requests one message at a time and turns statuses into our errors. */
class PeerCall {
  private readonly messages: Buffer[] = [];
  private status: grpc.StatusObject | undefined;
  /** Why the call was given up before the peer's status arrived (wrong node answering). */
  private abandoned: ConnectError | undefined;
  /** Why we cancelled the call (our caller's abort). */
  private cancelled: ConnectError | undefined;
  private reading = false;
  private wake: (() => void) | undefined;
  private removeAbortListener: (() => void) | undefined;

  constructor(
    private readonly call: GrpcCall,
    private readonly node: string,
    private readonly address: string,
    private readonly hooks: { onTransportFailure(): void; onStatus(code: number): void; onMessage(): void },
  ) {}

  start(request: Buffer, signal: AbortSignal): void {
    const notify = () => {
      const wake = this.wake;
      this.wake = undefined;
      wake?.();
    };
    this.call.start(new grpc.Metadata(), {
      onReceiveMetadata: (metadata) => {
        const by = answeredBy(metadata);
        if (by !== undefined && by !== this.node) {
          this.abandoned = this.staleAddress(by);
          this.call.cancelWithStatus(grpc.status.CANCELLED, 'the wrong node answered');
          notify();
        }
      },
      onReceiveMessage: (message: Buffer) => {
        this.hooks.onMessage();
        this.reading = false;
        this.messages.push(message);
        notify();
      },
      onReceiveStatus: (status) => {
        this.status = status;
        this.hooks.onStatus(status.code);
        notify();
      },
    });
    const onAbort = () => {
      // Our caller went away, or this driver is shutting down: end with what a local call would end with.
      const reason: unknown = signal.reason;
      this.cancelled =
        reason instanceof ConnectError
          ? reason
          : new ConnectError('the call was aborted before the owner had answered', Code.Unavailable);
      this.call.cancelWithStatus(grpc.status.CANCELLED, 'the caller cancelled the call');
    };
    if (signal.aborted) onAbort();
    else {
      signal.addEventListener('abort', onAbort, { once: true });
      this.removeAbortListener = () => signal.removeEventListener('abort', onAbort);
    }
    this.call.sendMessageWithContext({}, request);
    this.call.halfClose();
  }

  /** The next message, or undefined when the owner ended the call with OK; throws the call's error otherwise. */
  async next(): Promise<Buffer | undefined> {
    for (;;) {
      if (this.abandoned) throw this.abandoned;
      const message = this.messages.shift();
      if (message !== undefined) return message;
      if (this.status) return this.settle(this.status);
      if (!this.reading) {
        this.reading = true;
        this.call.startRead();
      }
      await new Promise<void>((resolve) => {
        this.wake = resolve;
      });
    }
  }

  /** Stops the call if it is still running (our caller went away or failed). */
  end(): void {
    this.removeAbortListener?.();
    if (!this.status) this.call.cancelWithStatus(grpc.status.CANCELLED, 'the forwarding call ended');
  }

  /** An error about this peer that is ours, not the owner's (a protocol violation). */
  failure(code: Code, what: string): ConnectError {
    return new ConnectError(`node ${this.node} (${this.address}) ${what}`, code);
  }

  private settle(status: grpc.StatusObject): undefined {
    const by = answeredBy(status.metadata);
    if (by === this.node) {
      if (status.code === grpc.status.OK) return undefined;
      // The owner's answer, as it gave it.
      const exact = status.metadata.get(EXACT_MESSAGE_TRAILER)[0];
      const message = Buffer.isBuffer(exact) ? exact.toString('utf8') : status.details;
      throw new ConnectError(message, status.code as number as Code);
    }
    if (by !== undefined) throw this.staleAddress(by);
    if (status.code === grpc.status.DEADLINE_EXCEEDED) {
      throw new ConnectError(`the deadline passed while node ${this.node} was answering`, Code.DeadlineExceeded);
    }
    if (status.code === grpc.status.CANCELLED) {
      throw this.cancelled ?? new ConnectError(`node ${this.node} cancelled the call`, Code.Canceled);
    }
    this.hooks.onTransportFailure();
    throw new ConnectError(
      `node ${this.node}, which holds this object, is unavailable: its driver at ${this.address} did not answer (${status.details})`,
      Code.Unavailable,
    );
  }

  private staleAddress(by: string): ConnectError {
    this.hooks.onTransportFailure();
    return new ConnectError(
      `node ${this.node}, which holds this object, is unavailable: ${this.address} is now the driver of node ${by}`,
      Code.Unavailable,
    );
  }
}

/** Client side of peer TLS: our certificate for the peer to check, and the peer CA to check theirs. */
export function peerChannelCredentials(tls: PeerTls): grpc.ChannelCredentials {
  return grpc.credentials.createSsl(tls.ca, tls.key, tls.cert);
}

function answeredBy(metadata: grpc.Metadata): string | undefined {
  const value = metadata.get(NODE_HEADER)[0];
  return typeof value === 'string' ? value : undefined;
}

function codeName(code: number): string {
  return grpc.status[code] ?? String(code);
}
