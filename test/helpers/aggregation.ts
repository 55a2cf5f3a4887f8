/**
 * Registers a test server with the test control plane's aggregator, as deploy/ does in a cluster:
 * an ExternalName Service `kmm-preflight/kmm-preflight` pointing at localhost (KUBE-TESTBED.md:
 * Endpoints may not hold loopback addresses) and the APIService `v1beta2.kmm.sigs.x-k8s.io` with
 * the server's CA. Resolves once kube-apiserver serves the group (the aggregator may answer 404
 * for a few seconds after the APIService turns Available). The namespace must exist.
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { ControlPlane } from './control-plane.ts';
import type { TestServer } from './server.ts';

export async function registerAggregatedServer(cp: ControlPlane, server: TestServer, timeoutMs = 90_000): Promise<void> {
  const caBundle = (await readFile(join(server.certDir, 'ca.crt'))).toString('base64');
  const applied = await cp.kubectl(['apply', '-f', '-'], {
    input: `apiVersion: v1
kind: Service
metadata: {name: kmm-preflight, namespace: kmm-preflight}
spec: {type: ExternalName, externalName: localhost}
---
apiVersion: apiregistration.k8s.io/v1
kind: APIService
metadata: {name: v1beta2.kmm.sigs.x-k8s.io}
spec:
  group: kmm.sigs.x-k8s.io
  version: v1beta2
  groupPriorityMinimum: 1000
  versionPriority: 100
  service: {name: kmm-preflight, namespace: kmm-preflight, port: ${server.port}}
  caBundle: ${caBundle}
`,
  });
  if (applied.code !== 0) throw new Error(`registering the APIService failed: ${applied.stderr}`);
  const deadline = Date.now() + timeoutMs;
  while ((await cp.kubectl(['get', '--raw', '/apis/kmm.sigs.x-k8s.io/v1beta2'])).code !== 0) {
    if (Date.now() > deadline) throw new Error(`kube-apiserver did not serve kmm.sigs.x-k8s.io/v1beta2 within ${timeoutMs} ms\nserver output:\n${server.output().slice(-4000)}`);
    await new Promise((r) => setTimeout(r, 250));
  }
}
