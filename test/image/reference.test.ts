import t from 'tap';
import { isImageReference, parseImageReference, withDefaultTag } from '../../src/image/reference.ts';

t.test('a registry with a port is a registry, not a tag', async (t) => {
  const r = parseImageReference('registry.example.com:5000/drivers/gpu:6.1.0');
  t.equal(r.domain, 'registry.example.com:5000');
  t.equal(r.path, 'drivers/gpu');
  t.equal(r.tag, '6.1.0');
  const local = parseImageReference('localhost:5000/kmod');
  t.equal(local.domain, 'localhost:5000');
  t.equal(local.tag, undefined);
});

t.test('docker.io defaults and library/ for official images', async (t) => {
  t.equal(parseImageReference('busybox').normalized, 'docker.io/library/busybox');
  t.equal(parseImageReference('org/app:v1').normalized, 'docker.io/org/app:v1');
  t.equal(parseImageReference('index.docker.io/busybox').normalized, 'docker.io/library/busybox');
  t.equal(withDefaultTag(parseImageReference('busybox')).normalized, 'docker.io/library/busybox:latest');
});

t.test('digests, and tag plus digest', async (t) => {
  const d = 'sha256:22e149142517dfccb47be828f012659b1ccf71d26620e6f62468c264a7ce7863';
  const r = parseImageReference(`quay.io/openshift-release-dev/ocp-release@${d}`);
  t.equal(r.digest, d);
  t.equal(r.tag, undefined);
  const both = parseImageReference(`quay.io/a/b:4.14@${d}`);
  t.equal(both.tag, '4.14');
  t.equal(both.digest, d);
  t.equal(withDefaultTag(r), r, 'a digest reference gets no default tag');
});

t.test('IPv6 registries', async (t) => {
  t.equal(parseImageReference('[::1]:5000/a/b:c').domain, '[::1]:5000');
});

t.test('invalid references are rejected with the reason', async (t) => {
  t.throws(() => parseImageReference(''), /empty/);
  t.throws(() => parseImageReference('Quay.io'), /repository name/);
  t.throws(() => parseImageReference('quay.io/UPPER/case'), /repository name/);
  t.throws(() => parseImageReference('a/b@sha256:abc'), /digest/);
  t.throws(() => parseImageReference('a/b:bad tag'), /white space/);
  t.throws(() => parseImageReference('a/b:-tag'), /tag/);
  t.notOk(isImageReference('http://quay.io/a/b'));
  t.ok(isImageReference('quay.io/a/b'));
});
