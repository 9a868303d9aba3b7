"""Stream readers: good files of every format, every bad input, and the shared real logs."""

import gzip

import numpy as np
import pytest

from lukern.replay import streams as S
from lukern.replay.streams import StreamFormatError, infer_format, read_stream

ML_HEADER = "userId,movieId,rating,timestamp\n"
TD_HEADER = "..ip,app,device,os,channel,click_time,attributed_time,is_attributed\n"
AVAZU_HEADER = ("id,click,hour,C1,banner_pos,site_id,site_domain,site_category,app_id,app_domain,app_category,"
                "device_id,device_ip,device_model,device_type,device_conn_type,C14,C15,C16,C17,C18,C19,C20,C21\n")


def write(path, text, gz=False):
    data = text.encode()
    if gz:
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def criteo_line(label="0", ints=None, cats=None):
    ints = ints if ints is not None else [str(i) for i in range(13)]
    cats = cats if cats is not None else [f"{i:08x}" for i in range(26)]
    return "\t".join([label, *ints, *cats]) + "\n"


def avazu_line(click="0", hour="14102100", rid="1", dev_ip="ip1"):
    cats = ["1005", "0", "s1", "d1", "c1", "a1", "ad1", "ac1", "dev1", dev_ip, "m1", "1", "0",
            "15704", "320", "50", "1722", "0", "35", "100084", "79"]
    return ",".join([rid, click, hour, *cats]) + "\n"


# ------------------------------------------------------------------ MovieLens


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("prefix", ["", "ml-latest-small_"])
def test_movielens_with_movies_beside(tmp_path, gz, prefix):
    ext = ".csv.gz" if gz else ".csv"
    write(tmp_path / f"{prefix}ratings{ext}",
          ML_HEADER + "1,10,4.0,300\n1,20,3.5,100\n2,10,5.0,200\n3,99,1.0,50\n", gz)
    write(tmp_path / f"{prefix}movies{ext}",
          'movieId,title,genres\n10,"Heat, The (1995)",Action|Crime\n20,Toy Story (1995),Animation\n', gz)
    s = read_stream(tmp_path / f"{prefix}ratings{ext}")
    assert s.format == "movielens" and not s.was_sorted
    np.testing.assert_array_equal(s.t, [50, 100, 200, 300])
    np.testing.assert_array_equal(s.labels, [0, 0, 1, 1])
    assert s.cat_names == ["user", "item", "genres"]
    assert s.cat_sizes == [3, 3, 3]  # 3 users, 3 movies, genre sets {Action|Crime, Animation, unknown}
    # same movie -> same id; rows in time order: movies 99, 20, 10, 10
    assert s.cat[2, 1] == s.cat[3, 1] and s.cat[2, 2] == s.cat[3, 2]
    # causal counts: the 2nd rating of movie 10 sees one earlier rating of it
    j = s.dense_names.index("log_prior_item")
    np.testing.assert_allclose(s.dense[:, j], np.log1p([0, 0, 0, 1]) / 5, rtol=1e-6)
    yr = s.dense[:, s.dense_names.index("release_year")]
    np.testing.assert_allclose(yr, [0, 0.25, 0.25, 0.25])  # movie 99 unknown -> 0


def test_folder_with_one_log(tmp_path):
    write(tmp_path / "ratings.csv.gz", ML_HEADER + "1,10,4.0,3\n", gz=True)
    write(tmp_path / "movies.csv", "movieId,title,genres\n10,X (2001),Drama\n")
    assert read_stream(tmp_path).cat_names == ["user", "item", "genres"]
    write(tmp_path / "u.data", "1\t2\t3\t4\n")
    with pytest.raises(StreamFormatError, match="is a folder; found ratings.csv.gz, u.data"):
        read_stream(tmp_path)


def test_movielens_without_movies_and_no_header(tmp_path):
    p = write(tmp_path / "ratings.csv", "1,10,4.0,3\n2,10,2.0,1\n")
    s = read_stream(p)
    assert s.cat_names == ["user", "item"]
    np.testing.assert_array_equal(s.labels, [0, 1])


def test_batches_time_ordered(tmp_path):
    rows = "".join(f"{i % 3},{i % 5},{(i % 10) / 2},{1000 - i}\n" for i in range(25))
    s = read_stream(write(tmp_path / "ratings.csv", ML_HEADER + rows))
    bs = list(s.batches(10))
    assert [len(b) for b in bs] == [10, 10, 5]
    t = np.concatenate([b.t for b in bs])
    assert (np.diff(t) >= 0).all()


# ------------------------------------------------------------------ ml-100k


def test_ml100k_with_item_and_user_files(tmp_path):
    write(tmp_path / "u.data", "1\t2\t5\t30\n2\t1\t3\t10\n1\t1\t4\t20\n")
    genres = ["0"] * 19
    g1 = genres.copy()
    g1[3] = "1"
    write(tmp_path / "u.item", "1|Toy Story (1995)|01-Jan-1995||http://x|" + "|".join(g1) + "\n"
                               "2|GoldenEye (1995)|01-Jan-1995||http://y|" + "|".join(genres) + "\n")
    write(tmp_path / "u.user", "1|24|M|technician|85711\n2|53|F|other|94043\n")
    s = read_stream(tmp_path / "u.data")
    assert s.format == "ml-100k"
    np.testing.assert_array_equal(s.t, [10, 20, 30])
    np.testing.assert_array_equal(s.labels, [0, 1, 1])
    assert s.cat_names == ["user", "item", "genres", "gender", "occupation"]
    np.testing.assert_allclose(s.dense[:, s.dense_names.index("age")], [53 / 50, 24 / 50, 24 / 50], rtol=1e-6)


# ------------------------------------------------------------------ TalkingData


def test_talkingdata_header_quirk_sort_and_hash(tmp_path):
    rows = ["87540,12,1,13,497,2017-11-07 09:30:38,,0\n",
            "105560,25,1,17,259,2017-11-06 16:00:00,2017-11-06 16:10:00,1\n",
            "87540,12,1,13,497,2017-11-07 09:30:38,,0\n"]
    s = read_stream(write(tmp_path / "train_sample.csv", TD_HEADER + "".join(rows)), "talkingdata", hash_rows=64)
    assert not s.was_sorted
    np.testing.assert_array_equal(s.t, [1509984000, 1510047038, 1510047038])
    np.testing.assert_array_equal(s.labels, [1, 0, 0])
    assert s.cat_names == ["ip", "app", "device", "os", "channel"] and s.hashed[0] and not s.hashed[1]
    assert s.cat_sizes[0] == 64 and s.cat[1, 0] == s.cat[2, 0] and (s.cat[:, 0] < 64).all()
    # hashing is stable across reads (no salted Python hash)
    s2 = read_stream(tmp_path / "train_sample.csv", "talkingdata", hash_rows=64)
    np.testing.assert_array_equal(s.cat, s2.cat)


def test_talkingdata_plain_header(tmp_path):
    p = write(tmp_path / "td.csv", TD_HEADER.replace("..ip", "ip") + "1,2,3,4,5,2017-11-07 00:00:00,,0\n")
    assert read_stream(p, "talkingdata").cat.shape == (1, 5)


# ------------------------------------------------------------------ Criteo


def test_criteo_missing_values_and_hash_range(tmp_path):
    ints = [""] * 13
    ints[1] = "-3"
    text = criteo_line("1") + criteo_line("0", ints=ints, cats=[""] * 26) + criteo_line("0")
    s = read_stream(write(tmp_path / "criteo_day.tsv.gz", text, gz=True))
    assert s.format == "criteo" and s.cat.shape == (3, 26) and s.dense.shape == (3, 13)
    np.testing.assert_array_equal(s.t, [0, 1, 2])
    np.testing.assert_array_equal(s.labels, [1, 0, 0])
    np.testing.assert_allclose(s.dense[1, :3], [0, -np.log1p(3), 0], rtol=1e-6)
    np.testing.assert_array_equal(s.cat[0], s.cat[2])
    assert all((s.cat[:, f] < s.cat_sizes[f]).all() for f in range(26))


# ------------------------------------------------------------------ Avazu


@pytest.mark.parametrize("header", [True, False])
def test_avazu_with_and_without_header(tmp_path, header):
    text = (AVAZU_HEADER if header else "") + avazu_line("1", "14102101", "1") + avazu_line("0", "14102100", "2")
    s = read_stream(write(tmp_path / "avazu_dev.csv", text))
    assert len(s) == 2 and s.cat.shape == (2, 21) and not s.was_sorted
    np.testing.assert_array_equal(s.t, [1413849600, 1413853200])
    np.testing.assert_array_equal(s.labels, [0, 1])


# ------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize("fmt,name", [("movielens", "ratings.csv"), ("ml-100k", "u.data"),
                                      ("talkingdata", "train_sample.csv"), ("criteo", "day.tsv"),
                                      ("avazu", "avazu.csv")])
def test_empty_file(tmp_path, fmt, name):
    p = write(tmp_path / name, "")
    with pytest.raises(StreamFormatError, match="no data rows"):
        read_stream(p, fmt)


def test_empty_file_without_a_format_says_empty(tmp_path):
    p = write(tmp_path / "log.txt", "")
    with pytest.raises(StreamFormatError, match="is empty \\(0 bytes\\)"):
        read_stream(p)


@pytest.mark.parametrize("fmt,header", [("movielens", ML_HEADER), ("talkingdata", TD_HEADER), ("avazu", AVAZU_HEADER)])
def test_header_only(tmp_path, fmt, header):
    with pytest.raises(StreamFormatError, match="no data rows"):
        read_stream(write(tmp_path / "x.csv", header), fmt)


@pytest.mark.parametrize("fmt,text", [
    ("movielens", ML_HEADER + "".join(f"{i},{i},4.0,{i}\n" for i in range(3000))),
    ("criteo", criteo_line() * 3000),
])
def test_truncated_gzip(tmp_path, fmt, text):
    blob = gzip.compress(text.encode())
    p = tmp_path / "cut.gz"
    p.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(StreamFormatError, match="truncated"):
        read_stream(p, fmt)


def test_gz_name_but_not_gzip(tmp_path):
    p = write(tmp_path / "ratings.csv.gz", "<html>not found</html>")
    with pytest.raises(StreamFormatError, match="not gzip"):
        read_stream(p)


@pytest.mark.parametrize("fmt,text,line", [
    ("movielens", ML_HEADER + "1,2,4.0,5\n1,2,4.0\n", 3),
    ("ml-100k", "1\t2\t4\t5\n1\t2\t4\n", 2),
    ("talkingdata", TD_HEADER + "1,2,3,4,5,2017-11-07 00:00:00,,0\n1,2,3\n", 3),
    ("criteo", criteo_line() + "0\t1\t2\n", 2),
    ("avazu", AVAZU_HEADER + avazu_line() + "1,0,14102100\n", 3),
])
def test_too_few_columns(tmp_path, fmt, text, line):
    p = write(tmp_path / "bad.txt", text)
    with pytest.raises(StreamFormatError, match=rf"bad.txt, line {line}: has \d+ fields") as e:
        read_stream(p, fmt)
    assert e.value.line == line
    s = read_stream(p, fmt, skip_bad=True)
    assert len(s) == 1 and s.n_skipped == 1 and s.skipped[0][0] == line


def test_wrong_format_given_names_the_one_the_file_has(tmp_path):
    p = write(tmp_path / "ratings.csv", ML_HEADER + "1,2,4.0,5\n1,3,3.0,6\n")
    with pytest.raises(StreamFormatError, match="does not read as criteo data and looks like movielens data: "
                                                "pass format='movielens'") as e:
        read_stream(p, "criteo")
    assert e.value.line == 1 and "Criteo" in str(e.value)  # the reader's own message follows
    with pytest.raises(StreamFormatError, match="looks like movielens"):
        read_stream(p, "criteo", skip_bad=True)  # every line skipped: still the wrong format
    assert len(read_stream(p, "movielens")) == 2


@pytest.mark.parametrize("fmt,text,line", [
    ("talkingdata", TD_HEADER + "1,2,3,4,5,2017-11-07 00:00:00,,0\n1,2,3,4,5,2017-11-07 00:00:01,,2\n", 3),
    ("criteo", criteo_line() + criteo_line("3"), 2),
    ("avazu", avazu_line("-1") + avazu_line("0"), 1),
])
def test_label_outside_01(tmp_path, fmt, text, line):
    p = write(tmp_path / "bad.txt", text)
    with pytest.raises(StreamFormatError, match=rf"line {line}: label .* outside \{{0, 1\}}"):
        read_stream(p, fmt)
    s = read_stream(p, fmt, skip_bad=True)
    assert len(s) == 1 and s.n_skipped == 1


@pytest.mark.parametrize("fmt,text,line", [
    ("movielens", ML_HEADER + "1,2,4.0,5\n1,2,4.0,yesterday\n", 3),
    ("ml-100k", "1\t2\t4\tnan\n1\t2\t4\t5\n", 1),
    ("talkingdata", TD_HEADER + "1,2,3,4,5,2017-11-07 00:00:00,,0\n1,2,3,4,5,7th Nov,,0\n", 3),
    ("avazu", avazu_line() + avazu_line(hour="2014-10-21"), 2),
])
def test_time_not_numeric(tmp_path, fmt, text, line):
    p = write(tmp_path / "bad.txt", text)
    with pytest.raises(StreamFormatError, match=rf"line {line}: .*(timestamp|click_time|hour)"):
        read_stream(p, fmt)
    assert read_stream(p, fmt, skip_bad=True).n_skipped == 1


def test_first_bad_line_in_file_order_is_reported(tmp_path):
    # a value error on line 2 comes before a column-count error on line 4
    p = write(tmp_path / "ratings.csv", ML_HEADER + "1,x,4.0,5\n1,2,4.0,5\n1,2\n")
    with pytest.raises(StreamFormatError, match="line 2: movieId 'x' is not"):
        read_stream(p)
    s = read_stream(p, skip_bad=True)
    assert s.n_skipped == 2 and [ln for ln, _ in s.skipped] == [2, 4]


def test_rating_out_of_range_and_all_bad(tmp_path):
    p = write(tmp_path / "ratings.csv", ML_HEADER + "1,2,7.0,5\n")
    with pytest.raises(StreamFormatError, match=r"line 2: rating 7 is outside \[0, 5\]"):
        read_stream(p)
    with pytest.raises(StreamFormatError, match="no valid rows"):
        read_stream(p, skip_bad=True)


def test_wrong_header_names_format(tmp_path):
    p = write(tmp_path / "ratings.csv", "a,b,c,d\n1,2,3,4\n")
    with pytest.raises(StreamFormatError, match="not a MovieLens ratings header"):
        read_stream(p)
    p = write(tmp_path / "x.csv", "ip,app,device,os,channel,click_time,is_attributed,extra\n1,2,3,4,5,6,7,8\n")
    with pytest.raises(StreamFormatError, match="not the TalkingData header"):
        read_stream(p, "talkingdata")


def test_infer_format_by_name_and_content(tmp_path):
    assert infer_format("x/ml-latest-small_ratings.csv.gz") == "movielens"
    assert infer_format("ml-100k/u.data") == "ml-100k"
    assert infer_format("talkingdata_adtracking_train_sample.csv.gz") == "talkingdata"
    assert infer_format("criteo_dac_head8k_dev.tsv.gz") == "criteo"
    assert infer_format("avazu_head9k_test.csv.gz") == "avazu"
    cases = {"a.csv": ML_HEADER + "1,2,3,4\n", "b.csv": TD_HEADER, "c.csv": AVAZU_HEADER,
             "d.txt": criteo_line(), "e.txt": "1\t2\t3\t4\n", "f.csv": avazu_line()}
    want = {"a.csv": "movielens", "b.csv": "talkingdata", "c.csv": "avazu", "d.txt": "criteo",
            "e.txt": "ml-100k", "f.csv": "avazu"}
    for name, text in cases.items():
        assert infer_format(write(tmp_path / name, text, gz=name == "d.txt")) == want[name]
    with pytest.raises(StreamFormatError, match="pass --format"):
        infer_format(write(tmp_path / "g.csv", "hello,world\n"))
    with pytest.raises(ValueError, match="must be one of"):
        read_stream(tmp_path / "a.csv", "parquet")
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_stream(tmp_path / "missing.csv", "movielens")


def test_encode_hash_is_deterministic_and_in_range():
    vals = np.array([f"{i:08x}" for i in range(1000)])
    a, rows = S._encode(vals, open_vocab=True, hash_rows=97, salt=3)
    b, _ = S._encode(vals[::-1], open_vocab=True, hash_rows=97, salt=3)
    assert rows == 97 and a.min() >= 0 and a.max() < 97
    np.testing.assert_array_equal(a, b[::-1])
    assert len(np.unique(a)) > 80  # spreads over the table
    np.testing.assert_array_equal(S._prior_counts(np.array([5, 3, 5, 5, 3])), [0, 0, 1, 2, 1])


# ------------------------------------------------------------------ shared real logs


def test_shared_movielens(shared_data):
    s = read_stream(shared_data / "ml-latest-small_ratings.csv.gz")
    assert s.format == "movielens" and len(s) == 100_836 and not s.was_sorted
    assert s.cat_names == ["user", "item", "genres"] and s.cat_sizes[:2] == [610, 9724]
    assert abs(float(s.labels.mean()) - 0.482) < 0.001
    assert (np.diff(s.t) >= 0).all()
    assert s.t[0] == 828124615 and s.t[-1] == 1537799250


def test_shared_talkingdata(shared_data):
    s = read_stream(shared_data / "talkingdata_adtracking_train_sample.csv.gz")
    assert s.format == "talkingdata" and len(s) == 100_000 and int(s.labels.sum()) == 227
    assert s.t[0] == np.datetime64("2017-11-06T16:00:00").astype(np.int64)
    assert s.t[-1] == np.datetime64("2017-11-09T15:59:51").astype(np.int64)
    assert s.cat_sizes[1:] == [161, 100, 130, 161]


@pytest.mark.parametrize("name,rows,pos", [("criteo_dac_head8k_train.tsv.gz", 7200, 1549),
                                           ("criteo_dac_head8k_dev.tsv.gz", 409, 93),
                                           ("avazu_head9k_train.csv.gz", 8087, 1397),
                                           ("avazu_head9k_test.csv.gz", 432, 80)])
def test_shared_format_fixtures(shared_data, name, rows, pos):
    s = read_stream(shared_data / name)
    assert len(s) == rows and int(s.labels.sum()) == pos and s.n_skipped == 0


def test_trailing_counts_against_brute_force():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 5, 200)
    t = np.sort(rng.uniform(0, 100, 200))
    t[10] = t[11]  # a tie
    got = S._trailing_counts(ids, t, 7.5)
    want = [int(np.sum((ids[:i] == ids[i]) & (t[:i] >= t[i] - 7.5))) for i in range(200)]
    np.testing.assert_array_equal(got, want)
