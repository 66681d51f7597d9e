// hmu_core_test: checks of the core library that need no runtime and no GPU (CTest, and
// tests/test_cpp.py runs it). pick_profile, the profile choice of the TensorRT backend, must
// take the tightest profile that holds a shape, as Python's select_profile does; sha256_hex
// (the manifest check of hmu_generate) must give the standard's digests.
#include <cstdio>
#include <string>
#include <vector>

#include "hmu/contract.hpp"
#include "hmu/error.hpp"
#include "hmu/verify.hpp"

namespace {

int failures = 0;
int checks = 0;

void expect(bool ok, const std::string& what) {
  ++checks;
  if (!ok) {
    ++failures;
    std::fprintf(stderr, "FAIL: %s\n", what.c_str());
  }
}

hmu::Profile profile(std::array<int64_t, 3> batch, std::array<int64_t, 3> src,
                     std::array<int64_t, 3> tgt) {
  hmu::Profile p;
  p.axes = {{"batch", batch}, {"src_len", src}, {"tgt_len", tgt}};
  return p;
}

hmu::Array ids(int64_t rows, int64_t cols) {
  hmu::Array a;
  a.dtype = "int64";
  a.shape = {rows, cols};
  a.data.assign(static_cast<size_t>(rows * cols) * 8, 0);
  return a;
}

// The full graph's contract: only the dynamic axes matter to pick_profile.
hmu::Contract full_contract() {
  hmu::Dim batch{-1, "batch"}, src{-1, "src_len"}, tgt{-1, "tgt_len"}, latent{4, ""};
  return {{{"src_ids", "int64", {batch, src}}, {"src_mask", "int64", {batch, src}},
           {"tgt_ids", "int64", {batch, tgt}}, {"noise", "float32", {batch, src, latent}}},
          {}};
}

hmu::Feeds feeds(int64_t b, int64_t ls, int64_t lt) {
  hmu::Array noise;
  noise.dtype = "float32";
  noise.shape = {b, ls, 4};
  noise.data.assign(static_cast<size_t>(b * ls * 4) * 4, 0);
  return {{"src_ids", ids(b, ls)}, {"src_mask", ids(b, ls)}, {"tgt_ids", ids(b, lt)},
          {"noise", noise}};
}

int pick(const std::vector<hmu::Profile>& profiles, int64_t b, int64_t ls, int64_t lt) {
  return hmu::pick_profile(profiles, full_contract(), feeds(b, ls, lt));
}

void test_pick_profile() {
  // [profile] first (covers everything), then engine.extra_profiles for short requests.
  const std::vector<hmu::Profile> profiles = {
      profile({1, 4, 8}, {1, 64, 128}, {1, 32, 64}),  // volume 65536
      profile({1, 1, 2}, {1, 8, 16}, {1, 4, 8}),      // volume 256: the tightest
      profile({1, 2, 4}, {1, 16, 32}, {1, 8, 16}),    // volume 2048
  };
  expect(pick(profiles, 1, 8, 4) == 1, "a short request takes the tightest profile, not the first");
  expect(pick(profiles, 2, 16, 8) == 1, "max sizes of the tightest profile are inside it");
  expect(pick(profiles, 3, 16, 8) == 2, "batch 3 is over profile 1's max: profile 2");
  expect(pick(profiles, 1, 17, 4) == 2, "src_len 17 is over profile 1's max: profile 2");
  expect(pick(profiles, 8, 128, 64) == 0, "only the first profile holds the maximum shape");
  expect(pick(profiles, 1, 1, 1) == 1, "the smallest shape fits all: the tightest wins");

  // Ties go to the lowest index; listing order does not matter otherwise.
  const std::vector<hmu::Profile> tie = {profile({1, 2, 4}, {1, 8, 8}, {1, 4, 4}),
                                         profile({1, 2, 4}, {1, 4, 8}, {1, 4, 4}),
                                         profile({1, 1, 1}, {1, 1, 1}, {1, 1, 1})};
  expect(pick(tie, 2, 8, 4) == 0, "equal volumes: the lowest index");
  expect(pick(tie, 1, 1, 1) == 2, "the tightest may be listed last");

  // A min above the shape excludes a profile even when it is the tightest.
  const std::vector<hmu::Profile> mins = {profile({1, 4, 8}, {1, 64, 128}, {1, 32, 64}),
                                          profile({2, 2, 2}, {1, 8, 8}, {1, 4, 4})};
  expect(pick(mins, 1, 8, 4) == 0, "batch 1 is under profile 1's min");
  expect(pick(mins, 2, 8, 4) == 1, "batch 2 fits profile 1");

  // An axis a profile does not name is unconstrained.
  hmu::Profile open;
  open.axes = {{"batch", {1, 1, 1}}};
  expect(pick({profiles[0], open}, 1, 100, 60) == 1, "unnamed axes do not constrain");

  bool threw = false;
  try {
    pick(profiles, 9, 8, 4);
  } catch (const hmu::Error& e) {
    threw = std::string(e.what()).rfind(
                "shape batch=9, src_len=8, tgt_len=4 is outside every engine profile (allowed: "
                "batch 1..8, src_len 1..128, tgt_len 1..64 | ", 0) == 0;
  }
  expect(threw, "a shape outside every profile is a one-line hmu::Error naming the profiles");
}

void test_sha256() {
  // FIPS 180-4 / NIST example vectors.
  expect(hmu::sha256_hex("") ==
             "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
         "sha256 of the empty string");
  expect(hmu::sha256_hex("abc") ==
             "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
         "sha256 of abc");
  expect(hmu::sha256_hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq") ==
             "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1",
         "sha256 of the 448-bit message (padding across a block)");
  expect(hmu::sha256_hex(std::string(1000000, 'a')) ==
             "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0",
         "sha256 of a million a");
}

}  // namespace

int main() {
  test_pick_profile();
  test_sha256();
  if (failures) {
    std::fprintf(stderr, "hmu_core_test: %d of %d checks failed\n", failures, checks);
    return 1;
  }
  std::printf("hmu_core_test: %d checks passed\n", checks);
  return 0;
}
