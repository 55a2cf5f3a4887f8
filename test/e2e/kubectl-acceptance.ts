/**
 * Acceptance: the real kubectl against the real server over TLS, as a cluster administrator uses it.
 */
import { chmod, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { Test } from 'tap';
import YAML from 'yaml';
import { kubectl, kubectlBackground, startTestServer, type TestServer } from '../helpers/server.ts';

const OCP_EXAMPLE = `apiVersion: kmm.sigs.x-k8s.io/v1beta2
kind: PreflightValidationOCP
metadata:
  name: preflight
spec:
  releaseImage: quay.io/openshift-release-dev/ocp-release@sha256:22e149142517dfccb47be828f012659b1ccf71d26620e6f62468c264a7ce7863
  pushBuiltImage: true
`;

const pfv = (name: string, kernel = '6.1.0-18-amd64') => `apiVersion: kmm.sigs.x-k8s.io/v1beta2
kind: PreflightValidation
metadata:
  name: ${name}
spec:
  kernelVersion: ${kernel}
`;

/**
 * Registers the acceptance tests on `t`, against a server started with `serverArgs` (the storage
 * backend, for one).
 */
export function kubectlAcceptance(t: Test, serverArgs: () => Promise<readonly string[]>): void {
  let server: TestServer;
  t.before(async () => {
    server = await startTestServer(await serverArgs());
  });
  t.teardown(async () => {
    await server?.stop();
  });

  async function ok(args: string[], input?: string) {
    const r = await kubectl(server, args, input !== undefined ? { input } : {});
    if (r.code !== 0) throw new Error(`kubectl ${args.join(' ')} failed (${r.code}):\n${r.stderr}\n${r.stdout}`);
    return r.stdout;
  }

  /** Writes a status the way the controller will, through the status subresource. */
  async function setStatus(kind: string, name: string, status: unknown) {
    return ok(['patch', kind, name, '--subresource=status', '--type=merge', '-p', JSON.stringify({ status })]);
  }

  t.test('kubectl api-resources lists both kinds with their short names', async (t) => {
    const out = await ok(['api-resources', '--api-group=kmm.sigs.x-k8s.io']);
    t.match(out, /preflightvalidations\s+pfv\s+kmm\.sigs\.x-k8s\.io\/v1beta2\s+false\s+PreflightValidation\b/);
    t.match(out, /preflightvalidationsocp\s+pfvo\s+kmm\.sigs\.x-k8s\.io\/v1beta2\s+false\s+PreflightValidationOCP\b/);
  });

  t.test('kubectl explain describes the spec fields', async (t) => {
    const out = await ok(['explain', 'preflightvalidations.spec']);
    t.match(out, /kernelVersion\s+<string> -required-/);
    t.match(out, /pushBuiltImage\s+<boolean>/);
    const ocp = await ok(['explain', 'pfvo.spec.releaseImage']);
    t.match(ocp, /OpenShift release image/);
    const status = await ok(['explain', 'pfv.status.modules.verificationStatus']);
    t.match(status, /True: verified/);
  });

  t.test('kubectl apply of the documented PreflightValidationOCP example, then again unchanged, then server-side', async (t) => {
    t.match(await ok(['apply', '-f', '-'], OCP_EXAMPLE), /preflightvalidationocp\.kmm\.sigs\.x-k8s\.io\/preflight created/);
    t.match(await ok(['apply', '-f', '-'], OCP_EXAMPLE), /preflightvalidationocp\.kmm\.sigs\.x-k8s\.io\/preflight unchanged/);
    const changed = OCP_EXAMPLE.replace('pushBuiltImage: true', 'pushBuiltImage: false');
    t.match(await ok(['apply', '-f', '-'], changed), /configured/);
    const obj = JSON.parse(await ok(['get', 'pfvo', 'preflight', '-o', 'json']));
    t.equal(obj.spec.pushBuiltImage, false);
    t.equal(obj.metadata.generation, 2, 'a spec change bumps the generation');
    t.match(await ok(['apply', '--server-side', '--force-conflicts', '-f', '-'], OCP_EXAMPLE), /serverside-applied/);
    const after = JSON.parse(await ok(['get', 'pfvo', 'preflight', '-o', 'json', '--show-managed-fields']));
    t.equal(after.spec.pushBuiltImage, true);
    t.ok(
      after.metadata.managedFields.some((m: { manager: string; operation: string }) => m.manager === 'kubectl' && m.operation === 'Apply'),
      'the server-side apply is recorded in managedFields',
    );
  });

  t.test('kubectl apply of a PreflightValidation; server-side apply of a new object; conflicts are reported', async (t) => {
    t.match(await ok(['apply', '-f', '-'], pfv('upgrade-6-1')), /preflightvalidation\.kmm\.sigs\.x-k8s\.io\/upgrade-6-1 created/);
    t.match(await ok(['apply', '-f', '-'], pfv('upgrade-6-1')), /unchanged/);
    t.match(await ok(['apply', '--server-side', '-f', '-'], pfv('ssa-new')), /ssa-new serverside-applied/);
    const conflict = await kubectl(server, ['apply', '--server-side', '--field-manager=other', '-f', '-'], {
      input: pfv('ssa-new', '6.2.0-1-amd64'),
    });
    t.not(conflict.code, 0, 'a second manager changing an owned field conflicts');
    t.match(conflict.stderr, /conflict/i);
    t.match(conflict.stderr, /spec\.kernelVersion/);
  });

  t.test('kubectl get shows the printer columns, and -o wide adds more', async (t) => {
    await setStatus('pfv', 'upgrade-6-1', {
      kernelVersion: '6.1.0-18-amd64',
      counts: { total: 3, verified: 1, failed: 1, error: 0, pending: 1 },
    });
    const out = await ok(['get', 'pfv']);
    const [header, ...rows] = out.trim().split('\n');
    t.match(header, /^NAME\s+KERNEL\s+VERIFIED\s+FAILED\s+PENDING\s+AGE$/);
    t.match(rows.join('\n'), /upgrade-6-1\s+6\.1\.0-18-amd64\s+1\s+1\s+1\s+\d+s/);
    const wide = await ok(['get', 'pfv', 'upgrade-6-1', '-o', 'wide']);
    t.match(wide, /ERRORS\s+TOTAL\s+PUSH\s+STATUS/);
    const ocp = await ok(['get', 'pfvo']);
    t.match(ocp, /^NAME\s+RELEASE\s+VERIFIED\s+FAILED\s+PENDING\s+AGE/);
    t.match(ocp, /preflight\s+quay\.io\/openshift-release-dev\/ocp-release@sha256:22e1/);
    t.match(await ok(['get', 'pfv', '-o', 'name']), /preflightvalidation\.kmm\.sigs\.x-k8s\.io\/upgrade-6-1/);
  });

  t.test('kubectl get -o yaml round-trips through kubectl replace', async (t) => {
    const yaml = await ok(['get', 'pfv', 'upgrade-6-1', '-o', 'yaml']);
    const obj = YAML.parse(yaml);
    t.equal(obj.kind, 'PreflightValidation');
    t.equal(obj.spec.kernelVersion, '6.1.0-18-amd64');
    t.equal(obj.status.counts.total, 3);
    t.match(await ok(['replace', '-f', '-'], yaml), /replaced/);
    const again = YAML.parse(await ok(['get', 'pfv', 'upgrade-6-1', '-o', 'yaml']));
    t.same(again.spec, obj.spec);
    t.same(again.status, obj.status, 'replace through the main resource keeps the status');
    const current = await server.request('GET', '/apis/kmm.sigs.x-k8s.io/v1beta2/preflightvalidations/upgrade-6-1');
    const put = await server.request('PUT', '/apis/kmm.sigs.x-k8s.io/v1beta2/preflightvalidations/upgrade-6-1', {
      body: current.body,
      headers: { 'content-type': 'application/json' },
    });
    t.equal(put.status, 200);
    t.equal(put.json<{ metadata: { resourceVersion: string } }>().metadata.resourceVersion, current.json<{ metadata: { resourceVersion: string } }>().metadata.resourceVersion, 'an unchanged update does not write');
  });

  t.test('kubectl get -w shows a later status change', async (t) => {
    const watch = kubectlBackground(server, ['get', 'pfv', 'upgrade-6-1', '-w']);
    t.teardown(() => void watch.child.kill());
    await watch.waitFor((o) => /upgrade-6-1/.test(o));
    await setStatus('pfv', 'upgrade-6-1', { counts: { total: 3, verified: 3, failed: 0, error: 0, pending: 0 } });
    const out = await watch.waitFor((o) => /upgrade-6-1\s+6\.1\.0-18-amd64\s+3\s+0\s+0/.test(o));
    t.match(out, /^NAME\s+KERNEL/m);
  });

  t.test('kubectl patch with merge and JSON patches', async (t) => {
    t.match(await ok(['patch', 'pfv', 'upgrade-6-1', '--type', 'merge', '-p', '{"spec":{"pushBuiltImage":true}}']), /patched/);
    t.match(
      await ok(['patch', 'pfv', 'upgrade-6-1', '--type', 'json', '-p', '[{"op":"replace","path":"/spec/kernelVersion","value":"6.1.0-20-amd64"}]']),
      /patched/,
    );
    const obj = JSON.parse(await ok(['get', 'pfv', 'upgrade-6-1', '-o', 'json']));
    t.equal(obj.spec.pushBuiltImage, true);
    t.equal(obj.spec.kernelVersion, '6.1.0-20-amd64');
    const bad = await kubectl(server, ['patch', 'pfv', 'upgrade-6-1', '--type', 'merge', '-p', '{"spec":{"kernelVersion":"tesdt"}}']);
    t.not(bad.code, 0);
    t.match(bad.stderr, /spec\.kernelVersion: Invalid value: "tesdt"/);
    t.match(await ok(['patch', 'pfv', 'upgrade-6-1', '-p', '{"metadata":{"labels":{"team":"gpu"}}}']), /patched/, 'the default strategic patch works');
    t.match(await ok(['get', 'pfv', '-l', 'team=gpu', '-o', 'name']), /upgrade-6-1/);
    t.equal((await ok(['get', 'pfv', '-l', 'team=nic', '-o', 'name'])).trim(), '');
  });

  t.test('kubectl edit with EDITOR set to a script', async (t) => {
    const editor = join(server.dir, 'editor.sh');
    await writeFile(editor, `#!/bin/sh\nsed -i 's/kernelVersion: .*/kernelVersion: 6.1.0-21-amd64/' "$1"\n`);
    await chmod(editor, 0o755);
    const r = await kubectl(server, ['edit', 'pfv', 'upgrade-6-1'], { env: { EDITOR: editor, KUBE_EDITOR: editor } });
    t.equal(r.code, 0, r.stderr);
    t.match(r.stdout, /edited/);
    const obj = JSON.parse(await ok(['get', 'pfv', 'upgrade-6-1', '-o', 'json']));
    t.equal(obj.spec.kernelVersion, '6.1.0-21-amd64');
  });

  t.test('kubectl wait --for=condition=Verified returns once the status says so', async (t) => {
    const wait = kubectlBackground(server, ['wait', '--for=condition=Verified', 'pfv/upgrade-6-1', '--timeout=30s']);
    await new Promise((r) => setTimeout(r, 1000));
    t.equal(wait.child.exitCode, null, 'still waiting while not verified');
    const now = new Date().toISOString().replace(/\.\d+Z$/, 'Z');
    await setStatus('pfv', 'upgrade-6-1', {
      conditions: [
        { type: 'Verified', status: 'True', reason: 'AllModulesVerified', message: 'all 3 Modules verified', lastTransitionTime: now },
      ],
    });
    const r = await wait.done;
    t.equal(r.code, 0, r.stderr);
    t.match(r.stdout, /condition met/);
  });

  t.test('kubectl delete waits for finalizers, then the object is gone', async (t) => {
    await ok(['apply', '-f', '-'], pfv('with-finalizer'));
    await ok(['patch', 'pfv', 'with-finalizer', '--type', 'merge', '-p', '{"metadata":{"finalizers":["kmm.sigs.x-k8s.io/test"]}}']);
    const del = kubectlBackground(server, ['delete', 'pfv', 'with-finalizer', '--timeout=30s']);
    await new Promise((r) => setTimeout(r, 1500));
    t.equal(del.child.exitCode, null, 'delete is still waiting for the finalizer');
    const obj = JSON.parse(await ok(['get', 'pfv', 'with-finalizer', '-o', 'json']));
    t.ok(obj.metadata.deletionTimestamp, 'the object is marked for deletion');
    await ok(['patch', 'pfv', 'with-finalizer', '--type', 'json', '-p', '[{"op":"remove","path":"/metadata/finalizers"}]']);
    const r = await del.done;
    t.equal(r.code, 0, r.stderr);
    t.match(r.stdout, /deleted/);
    const gone = await kubectl(server, ['get', 'pfv', 'with-finalizer']);
    t.not(gone.code, 0);
    t.match(gone.stderr, /NotFound|not found/);
    t.match(await ok(['delete', 'pfvo', 'preflight']), /deleted/);
  });

  t.test('bad requests get Status objects and the server keeps serving', async (t) => {
    const invalid = await kubectl(server, ['apply', '-f', '-'], { input: pfv('bad-kernel', 'tesdt') });
    t.not(invalid.code, 0);
    t.match(invalid.stderr, /spec\.kernelVersion: Invalid value: "tesdt"/);

    const post = (body: string | Buffer, type = 'application/json') =>
      server.request('POST', '/apis/kmm.sigs.x-k8s.io/v1beta2/preflightvalidations', { body, headers: { 'content-type': type } });

    const r422 = await post(JSON.stringify({ apiVersion: 'kmm.sigs.x-k8s.io/v1beta2', kind: 'PreflightValidation', metadata: { name: 'x' }, spec: { kernelVersion: 'tesdt' } }));
    t.equal(r422.status, 422);
    const s422 = r422.json<{ kind: string; reason: string; details: { causes: { field: string }[] } }>();
    t.equal(s422.kind, 'Status');
    t.equal(s422.reason, 'Invalid');
    t.same(s422.details.causes.map((c) => c.field), ['spec.kernelVersion']);

    const big = Buffer.alloc(3 * 1024 * 1024 + 10, 'a');
    const r413 = await post(big);
    t.equal(r413.status, 413);
    t.equal(r413.json().reason, 'RequestEntityTooLarge');

    const r400 = await post('{"apiVersion": ');
    t.equal(r400.status, 400);
    t.equal(r400.json().kind, 'Status');
    t.equal(r400.json().reason, 'BadRequest');

    const current = JSON.parse(await ok(['get', 'pfv', 'upgrade-6-1', '-o', 'json']));
    await ok(['label', 'pfv', 'upgrade-6-1', 'bump=1']);
    const r409 = await server.request('PUT', '/apis/kmm.sigs.x-k8s.io/v1beta2/preflightvalidations/upgrade-6-1', {
      body: JSON.stringify(current),
      headers: { 'content-type': 'application/json' },
    });
    t.equal(r409.status, 409);
    t.equal(r409.json().reason, 'Conflict');

    const r404 = await server.request('GET', '/apis/kmm.sigs.x-k8s.io/v1beta2/modules');
    t.equal(r404.status, 404);
    t.equal(r404.json().kind, 'Status');
    const unknownKind = await kubectl(server, ['get', 'nosuchthings']);
    t.not(unknownKind.code, 0);
    t.match(unknownKind.stderr, /doesn't have a resource type "nosuchthings"/);

    t.match(await ok(['get', 'pfv', 'upgrade-6-1', '-o', 'name']), /upgrade-6-1/, 'the server still serves');
  });
}
