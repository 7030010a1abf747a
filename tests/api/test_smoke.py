from bms.image.v1 import image_pb2


async def test_public_catalog_is_listed(images, as_project) -> None:
    response = await images.ListImages(image_pb2.ListImagesRequest(), metadata=as_project("alpha"))
    assert len(response.images) >= 6
    assert all(i.type == image_pb2.IMAGE_TYPE_PUBLIC for i in response.images)
