/** Prometheus metrics: per-RPC counts and latencies, metadata tuples streamed; served on --metrics-address. */
import http from 'node:http';
import { Counter, Histogram, Registry, collectDefaultMetrics } from 'prom-client';

export class DriverMetrics {
  readonly registry = new Registry();
  readonly rpcTotal = new Counter({
    name: 'cbt_csi_rpc_total',
    help: 'CSI RPCs handled, by method and gRPC code',
    labelNames: ['method', 'code'] as const,
    registers: [this.registry],
  });
  readonly rpcSeconds = new Histogram({
    name: 'cbt_csi_rpc_duration_seconds',
    help: 'CSI RPC latency, by method (streams: until the last message)',
    labelNames: ['method'] as const,
    buckets: [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10],
    registers: [this.registry],
  });
  readonly metadataTuples = new Counter({
    name: 'cbt_csi_snapshot_metadata_tuples_total',
    help: 'BlockMetadata tuples streamed by GetMetadataAllocated and GetMetadataDelta',
    labelNames: ['method'] as const,
    registers: [this.registry],
  });
  readonly faultsFired = new Counter({
    name: 'cbt_csi_faults_fired_total',
    help: 'Injected faults that fired (vendor bench: serve --faults, cbt-csi faults add), by RPC and action',
    labelNames: ['rpc', 'action'] as const,
    registers: [this.registry],
  });

  readonly peerRpcs = new Counter({
    name: 'cbt_csi_peer_rpc_total',
    help: 'Calls forwarded to the node that owns the object (multi-node), by peer node, method and gRPC code',
    labelNames: ['peer', 'method', 'code'] as const,
    registers: [this.registry],
  });
  readonly peerMessages = new Counter({
    name: 'cbt_csi_peer_messages_received_total',
    help: 'Reply messages read from peers (a stream is read one message at a time, as our caller takes them), by peer node',
    labelNames: ['peer'] as const,
    registers: [this.registry],
  });

  constructor() {
    collectDefaultMetrics({ register: this.registry, prefix: 'cbt_csi_' });
  }

  /** Serves /metrics on host:port; resolves with the bound address once listening. */
  async serve(address: string): Promise<{ server: http.Server; url: string }> {
    const at = address.lastIndexOf(':');
    const host = at > 0 ? address.slice(0, at).replace(/^\[|\]$/g, '') : '127.0.0.1';
    const port = Number(address.slice(at + 1));
    if (!Number.isInteger(port) || port < 0 || port > 65535)
      throw new Error(`metrics address ${address}: expected HOST:PORT`);
    const server = http.createServer((req, res) => {
      if (req.url !== '/metrics') {
        res.writeHead(404).end();
        return;
      }
      this.registry.metrics().then(
        (body) => res.writeHead(200, { 'content-type': this.registry.contentType }).end(body),
        () => res.writeHead(500).end(),
      );
    });
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(port, host, () => resolve());
    });
    const bound = server.address();
    const boundPort = typeof bound === 'object' && bound ? bound.port : port;
    return { server, url: `http://${host.includes(':') ? `[${host}]` : host}:${boundPort}/metrics` };
  }
}
